#!/bin/sh
# Sample package install script. Distributor runs it as `sh install.sh` from the extracted
# version folder, with BWS_* variables describing the platform and SSM_* additional arguments.
set -eu
target="${SSM_SAMPLE_TARGET:-$PWD/installed}"
mkdir -p "$target"
{
  echo "package=pkgmesh-sample"
  echo "version=$(cat VERSION)"
  echo "action=${BWS_ACTION_NAME:-install}"
  echo "platform=${BWS_PLATFORM_NAME:-unknown} ${BWS_PLATFORM_VERSION:-unknown} ${BWS_ARCHITECTURE:-unknown}"
} > "$target/sample.txt"
cp payload.txt "$target/payload.txt"
echo "pkgmesh-sample $(cat VERSION) installed into $target"
