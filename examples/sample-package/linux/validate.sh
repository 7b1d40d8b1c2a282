#!/bin/sh
# Succeeds only when this version's marker is in place.
set -eu
target="${SSM_SAMPLE_TARGET:-$PWD/installed}"
grep -qx "version=$(cat VERSION)" "$target/sample.txt"
