/*
 * moekit: CUDA kernels for Mixture-of-Experts layers behind a stable C ABI.
 * Umbrella header; each family has its own header with its contract.
 */
#ifndef MOEKIT_MOEKIT_H
#define MOEKIT_MOEKIT_H

#include "moekit/status.h"
#include "moekit/router.h"
#include "moekit/tokens.h"
#include "moekit/experts.h"
#include "moekit/layer.h"
#include "moekit/ep.h"

#endif /* MOEKIT_MOEKIT_H */
