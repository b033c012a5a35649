// What every AMX kernel shares: the process's permission to use the tile registers and the
// tile configuration's layout. Included only where the build has AMX (SHOAL_AMX).
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

#define SHOAL_AMX 1

namespace shoal {

// NOTE: Linux hands out the tile state only on request (arch_prctl, once per process);
// refused (an old kernel, a sandbox), the callers' other paths serve every batch.
inline bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

// The 64-byte operand of _tile_loadconfig (palette 1): bytes per row and rows of each tile.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

}  // namespace shoal
#endif
