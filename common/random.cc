#include "common/random.h"

#include <cmath>

namespace switchyard {
namespace {

inline uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

}  // namespace

uint64_t RandomBits(uint64_t seed, std::initializer_list<uint64_t> coords) {
  uint64_t h = SplitMix64(seed);
  for (uint64_t c : coords)
    h = SplitMix64(h ^ SplitMix64(c + 0x632BE59BD9B4E019ull));
  return h;
}

double RandomUniform(uint64_t seed, std::initializer_list<uint64_t> coords) {
  // 53 random bits, shifted off zero.
  return (static_cast<double>(RandomBits(seed, coords) >> 11) + 0.5) *
         (1.0 / 9007199254740992.0);
}

double RandomNormal(uint64_t seed, std::initializer_list<uint64_t> coords) {
  const uint64_t bits = RandomBits(seed, coords);
  const double u1 =
      (static_cast<double>(bits >> 11) + 0.5) * (1.0 / 9007199254740992.0);
  const double u2 = (static_cast<double>(SplitMix64(bits) >> 11) + 0.5) *
                    (1.0 / 9007199254740992.0);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

}  // namespace switchyard
