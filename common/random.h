// Counter-based random numbers: every value is a pure function of a seed and
// a tuple of coordinates (step, rank, layer, expert, element ...), so results
// never depend on thread count, sharding or call order (DESIGN.md).
// Stateless; thread-safe.
#ifndef SWITCHYARD_COMMON_RANDOM_H_
#define SWITCHYARD_COMMON_RANDOM_H_

#include <cstdint>
#include <initializer_list>

namespace switchyard {

// A 64-bit hash of (seed, coordinates...) with SplitMix64 finalisation.
uint64_t RandomBits(uint64_t seed, std::initializer_list<uint64_t> coords);

// Uniform in (0, 1), from RandomBits.
double RandomUniform(uint64_t seed, std::initializer_list<uint64_t> coords);

// Standard normal (Box-Muller over two uniforms derived from the same key).
double RandomNormal(uint64_t seed, std::initializer_list<uint64_t> coords);

}  // namespace switchyard

#endif  // SWITCHYARD_COMMON_RANDOM_H_
