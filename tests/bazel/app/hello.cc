#include <cstdio>

#include "lib/greet.h"

int main(int argc, char** argv) {
  std::printf("%s (version %s)\n", greet(argc > 1 ? argv[1] : "world").c_str(),
              version().c_str());
  return 0;
}
