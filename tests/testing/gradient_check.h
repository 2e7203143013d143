// Central differences for gradient checks in tests (header-only).
#ifndef SWITCHYARD_TESTS_TESTING_GRADIENT_CHECK_H_
#define SWITCHYARD_TESTS_TESTING_GRADIENT_CHECK_H_

#include <functional>
#include <vector>

namespace switchyard::testing {

// d loss / d v[i] for every element of *v, by central differences with step
// h: (loss(v + h e_i) - loss(v - h e_i)) / 2h. *v is restored.
inline std::vector<double> CentralDifferences(
    std::vector<double>* v, const std::function<double()>& loss, double h) {
  std::vector<double> grad(v->size());
  for (size_t i = 0; i < v->size(); ++i) {
    const double old = (*v)[i];
    (*v)[i] = old + h;
    const double up = loss();
    (*v)[i] = old - h;
    const double down = loss();
    (*v)[i] = old;
    grad[i] = (up - down) / (2 * h);
  }
  return grad;
}

}  // namespace switchyard::testing

#endif  // SWITCHYARD_TESTS_TESTING_GRADIENT_CHECK_H_
