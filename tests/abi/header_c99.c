/* The public headers compile as strict C99 with every warning as an error and no CUDA header,
 * and the library's entry points link from C. Runs without a GPU (no entry point below launches
 * anything). */
#include <stdio.h>
#include <string.h>

#include "moekit/moekit.h"

int main(void) {
    int failures = 0;
    if (moekit_get_version() != MOEKIT_VERSION) {
        printf("library version %d differs from header %d\n", (int)moekit_get_version(),
               MOEKIT_VERSION);
        failures++;
    }
    if (strcmp(moekit_status_string(MOEKIT_STATUS_SUCCESS), "success") != 0) failures++;
    if (moekit_status_string((moekit_status_t)12345) == NULL) failures++;
    if (moekit_dtype_size(MOEKIT_DTYPE_BF16) != 2) failures++;
    {
        moekit_router_config_t config;
        if (moekit_router_config_init(&config, sizeof(config)) != MOEKIT_STATUS_SUCCESS) failures++;
        /* E and K are unset: the size query must refuse and say why. */
        if (moekit_router_config_check(&config) !=
            MOEKIT_STATUS_INVALID_ARGUMENT)
            failures++;
        if (strstr(moekit_get_last_error(), "moekit_router_config_check") == NULL) {
            printf("message lacks the function name: '%s'\n", moekit_get_last_error());
            failures++;
        }
        {
            char small[8];
            size_t length = moekit_copy_last_error(small, sizeof(small));
            if (length != strlen(moekit_get_last_error()) || strlen(small) != 7) failures++;
        }
    }
    printf("%s\n", failures == 0 ? "header_c99: ok" : "header_c99: FAILED");
    return failures == 0 ? 0 : 1;
}
