#ifndef LIB_GREET_H_
#define LIB_GREET_H_

#include <string>

std::string greet(const std::string& who);
std::string version();

#endif  // LIB_GREET_H_
