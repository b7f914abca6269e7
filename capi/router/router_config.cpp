// C entry points for router configurations.
#include "capi/api.hpp"
#include "moekit/router.h"
#include "src/router/router_config.hpp"

using moekit::capi::guarded;

extern "C" {

MOEKIT_API moekit_status_t moekit_router_config_init(moekit_router_config_t* config,
                                                     size_t struct_size) {
  return guarded(__func__, [&] {
    MOEKIT_CHECK_NOT_NULL(config);
    moekit_router_config_t defaults;
    moekit::router::set_defaults(&defaults);
    // A caller compiled against an older header has a smaller struct: write only its part.
    MOEKIT_CHECK_ARG(struct_size >= offsetof(moekit_router_config_t, route_scale) + sizeof(float),
                     "struct_size = %zu is smaller than any released moekit_router_config_t",
                     struct_size);
    const size_t n = struct_size < sizeof(defaults) ? struct_size : sizeof(defaults);
    std::memcpy(static_cast<void*>(config), &defaults, n);
    config->struct_size = struct_size;
    return MOEKIT_STATUS_SUCCESS;
  });
}

MOEKIT_API moekit_status_t moekit_router_config_check(const moekit_router_config_t* config) {
  return guarded(__func__, [&] {
    moekit_router_config_t c;
    return moekit::router::read_and_check(config, &c);
  });
}

}  // extern "C"
