#!/bin/bash
set -euo pipefail
output="$("$1" test)"
expected="hello, test! (version 1.2.3)"
if [[ "$output" != "$expected" ]]; then
  echo "expected '$expected', got '$output'" >&2
  exit 1
fi
echo "hello_test passed"
