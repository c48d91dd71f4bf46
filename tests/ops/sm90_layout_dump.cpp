// Dumps the sparse-wgmma kernel's index math (src/vnmsparse/ops/csrc/vnm_sm90_layout.h, the header the kernel
// itself includes) as JSON, so tests/ops/test_wgmma_layout.py can check it on the CPU against the PTX ISA's
// operand layouts. Built with the host C++ compiler by that test:
//   sm90_layout_dump BN ROWS TILES_M TILES_N GROUP_M ROW_TILES SMEM_ADDR
//   sm90_layout_dump schedule TILES KC KSPLIT SM_COUNT      (the CTAs' segments, walked as the kernel walks them)
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "vnm_sm90_layout.h"

using namespace vnm::sm90;

static int dump_schedule(long long tiles, int kc, int ksplit, int sms) {
  const KSchedule sched = k_schedule(tiles, kc, ksplit, sms);
  std::printf("{\"ctas\": %lld, \"slices\": %d, \"segments\": [", sched.ctas, sched.slices);
  for (long long cta = 0; cta < sched.ctas; ++cta) {
    for (int done = 0;;) {  // the kernel's loop
      const Segment s = segment_at(cta, done, kc, tiles * kc, sched.ctas);
      std::printf("%s[%lld,%d,%d,%d,%d,%d,%d]", cta || done ? "," : "", cta, s.tile, s.kbeg, s.steps, s.slice, s.slices,
                  s.last ? 1 : 0);
      if (s.last) break;
      done += s.steps;
    }
  }
  std::printf("]}\n");
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 6 && std::strcmp(argv[1], "schedule") == 0)
    return dump_schedule(std::atoll(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]), std::atoi(argv[5]));
  if (argc != 8) {
    std::fprintf(stderr, "usage: %s BN ROWS TILES_M TILES_N GROUP_M ROW_TILES SMEM_ADDR\n", argv[0]);
    return 2;
  }
  const int bn = std::atoi(argv[1]), rows = std::atoi(argv[2]), tiles_m = std::atoi(argv[3]);
  const int tiles_n = std::atoi(argv[4]), group_m = std::atoi(argv[5]), row_tiles = std::atoi(argv[6]);
  const unsigned addr = static_cast<unsigned>(std::strtoul(argv[7], nullptr, 0));
  const int pieces = bn / 8, iters = gather_iters(rows, pieces);

  std::printf("{\"b_tile_bytes\": %d, \"gather_iters\": %d, \"gather_step\": %u,\n", b_tile_bytes(bn), iters,
              gather_dst_step(pieces, bn));
  std::printf("\"b_desc\": [");  // for SMEM_ADDR + 1024 * i: every B tile start a stage of <= 64 KB can have
  for (int i = 0; i < 64; ++i)
    std::printf("%s\"%llu\"", i ? "," : "", static_cast<unsigned long long>(b_desc(addr + 1024u * i, bn)));
  std::printf("],\n");
  std::printf("\"bk_desc\": [");  // window kernel: [i][k half] for SMEM_ADDR + 1024 * i
  for (int i = 0; i < 8; ++i)
    for (unsigned kb = 0; kb <= 64; kb += 64)
      std::printf("%s\"%llu\"", (i || kb) ? "," : "", static_cast<unsigned long long>(bk_desc(addr + 1024u * i, kb)));
  std::printf("],\n\"window_cols\": %d, \"pad_meta\": %u,\n", kWindowCols, kPadMeta);
  std::printf("\"b_tile_offset\": [");
  for (int k = 0; k < kKStep; ++k)
    for (int n = 0; n < bn; n += 8) std::printf("%s[%d,%d,%u]", (k || n) ? "," : "", k, n, b_tile_offset(k, n, bn));
  std::printf("],\n\"gather\": [");
  bool first = true;
  for (int w = 0; w < 4; ++w)
    for (int l = 0; l < 32; ++l)
      for (int it = 0; it < iters; ++it) {
        const GatherPiece g = gather_piece(w, l, it, pieces);
        std::printf("%s[%d,%d,%d,%d,%d,%d,%u]", first ? "" : ",", w, l, it, g.row, g.piece, g.owner,
                    gather_dst(w, l, it, pieces, bn));
        first = false;
      }
  std::printf("],\n\"owned_row\": [");
  for (int w = 0; w < 4; ++w)
    for (int l = 0; l < 32; ++l) std::printf("%s[%d,%d,%d]", (w || l) ? "," : "", w, l, owned_row(w, l));
  std::printf("],\n\"a_stage_offset\": [");  // [row tile][chunks = 1, 2][j][lane] -> (a offset, e offset)
  for (int rt = 0; rt < 16; ++rt)
    for (int chunks = 1; chunks <= 2; ++chunks)
      for (int j = 0; j < chunks; ++j)
        for (int l = 0; l < 32; ++l)
          std::printf("%s[%d,%d,%d,%d,%u,%u]", (rt || chunks > 1 || j || l) ? "," : "", rt, chunks, j, l,
                      a_stage_offset(rt, chunks, j, l), e_stage_offset(rt, chunks, j, l));
  std::printf("],\n\"meta_word\": [");
  for (int l = 0; l < 32; ++l) std::printf("%s%d", l ? "," : "", meta_word(l));
  std::printf("],\n\"stmatrix_row\": [");
  for (int jj = 0; jj < bn / 16; ++jj)
    for (int l = 0; l < 32; ++l) {
      const StRow r = stmatrix_row(l, jj);
      std::printf("%s[%d,%d,%d,%d]", (jj || l) ? "," : "", l, jj, r.n, r.m);
    }
  std::printf("],\n\"stmatrix_acc\": [");
  for (int jj = 0; jj < bn / 16; ++jj)
    for (int q = 0; q < 4; ++q) std::printf("%s%d", (jj || q) ? "," : "", stmatrix_acc(jj, q));
  std::printf("],\n\"b_tile_of\": [");  // [local][v = 64, 128][bm = 64, 128, 256]
  for (int local = 0; local < 4; ++local)
    for (int v = 64; v <= 128; v *= 2)
      for (int bm = 64; bm <= 256; bm *= 2)
        std::printf("%s[%d,%d,%d,%d]", (local || v > 64 || bm > 64) ? "," : "", local, v, bm, b_tile_of(local, v, bm));
  std::printf("],\n\"tile_coord\": [");
  for (int id = 0; id < tiles_m * tiles_n; ++id) {
    const TileCoord c = tile_coord(id, tiles_m, tiles_n, group_m);
    std::printf("%s[%d,%d]", id ? "," : "", c.m, c.n);
  }
  std::printf("]}\n");
  return 0;
}
