// Catch2 2.x (the development machines and CI: Debian's 2.13) and 3.x (the GPU machine) side by
// side. Test files include this and use only macros both majors have.
#pragma once

#if __has_include(<catch2/catch_all.hpp>)
#include <catch2/catch_all.hpp>
#define MOEKIT_CATCH_MAJOR 3
#elif __has_include(<catch2/catch.hpp>)
#include <catch2/catch.hpp>
#define MOEKIT_CATCH_MAJOR 2
#else
#error "Catch2 not found"
#endif
