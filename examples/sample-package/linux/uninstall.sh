#!/bin/sh
set -eu
target="${SSM_SAMPLE_TARGET:-$PWD/installed}"
rm -f "$target/sample.txt" "$target/payload.txt"
echo "pkgmesh-sample $(cat VERSION) removed from $target"
