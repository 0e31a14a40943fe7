#include <cstdio>

#include "lib/greet.h"

int main() {
  if (greet("mesh") != "hello, mesh!") {
    std::fprintf(stderr, "unexpected greeting: %s\n", greet("mesh").c_str());
    return 1;
  }
  if (version() != "1.2.3") {
    std::fprintf(stderr, "unexpected version: %s\n", version().c_str());
    return 1;
  }
  std::puts("greet_test passed");
  return 0;
}
