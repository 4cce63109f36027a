/* What the sources that run on AMX tiles share (gemm_amx.c, attention.c): the tile
 * configuration ldtilecfg reads. Included where the build has AMX (KERNELS_AMX). */
#ifndef PAGEDSERVE_AMX_H
#define PAGEDSERVE_AMX_H
#include <immintrin.h>
#include <stdint.h>

typedef struct { /* ldtilecfg's 64 bytes, palette 1: each tile's rows and bytes per row */
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

static inline void tile_shape(TileConfig *config, int tile, int rows, int bytes) {
    config->rows[tile] = (uint8_t)rows;
    config->colsb[tile] = (uint16_t)(rows ? bytes : 0); /* no rows: left unconfigured */
}

#endif
