// Test helper: data-plane options with a cluster secret every test plane
// shares, so that test planes authenticate to each other. Header-only.
#ifndef SWITCHYARD_TESTS_TESTING_DATA_PLANE_OPTIONS_H_
#define SWITCHYARD_TESTS_TESTING_DATA_PLANE_OPTIONS_H_

#include "transport/data_plane.h"

namespace switchyard::testing {

inline constexpr char kTestClusterSecret[] =
    "switchyard-tests-cluster-secret-0123456789";

inline transport::DataPlaneOptions TestDataPlaneOptions() {
  transport::DataPlaneOptions options;
  options.secret = kTestClusterSecret;
  return options;
}

}  // namespace switchyard::testing

#endif  // SWITCHYARD_TESTS_TESTING_DATA_PLANE_OPTIONS_H_
