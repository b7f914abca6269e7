// Router configuration as the host code sees it: the caller's extensible struct read into a
// full-size copy, validated, with AUTO resolved.
#pragma once

#include "kernels/router/launch.hpp"
#include "moekit/router.h"

namespace moekit::router {

// Defaults of every field (what moekit_router_config_init writes).
void set_defaults(moekit_router_config_t* config);

// Validates a full-size config; reports the first bad field with its value.
moekit_status_t check_config(const moekit_router_config_t& config);

// Reads the caller's struct (any released size) into `out` and validates it.
moekit_status_t read_and_check(const moekit_router_config_t* user, moekit_router_config_t* out);

// The group score actually used: AUTO resolves to TOP2_SUM with a bias and MAX without.
moekit_group_score_t effective_group_score(const moekit_router_config_t& config, bool has_bias);

// Everything the kernels read, resolved from a validated config: AUTO group score, normalise only
// when K > 1, the group mask value as a float.
kernels::router::RouterOptions resolve_options(const moekit_router_config_t& config, bool has_bias);

}  // namespace moekit::router
