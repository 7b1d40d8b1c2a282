#!/usr/bin/env bash
# Builds the sample multi-platform Distributor package with the `zip` command:
#   examples/sample-package/build.sh OUTDIR [VERSION] [PAYLOAD_KIB]
# OUTDIR receives one ZIP per platform and manifest.json with their SHA-256 checksums.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: build.sh OUTDIR [VERSION] [PAYLOAD_KIB]}"
version="${2:-1.0.0}"
payload_kib="${3:-64}"
command -v zip >/dev/null || { echo "build.sh: the zip command is required (apt-get install zip)" >&2; exit 1; }
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# build_zip NAME SCRIPTS_DIR: one ZIP with the scripts at its root, a VERSION file and a payload
# that differs per ZIP, so every platform's file has its own checksum.
build_zip() {
  local name="$1" scripts="$2" dir="$work/$1"
  mkdir -p "$dir"
  cp "$here/$scripts"/* "$dir/"
  echo "$version" > "$dir/VERSION"
  {
    echo "pkgmesh sample payload for $name, version $version"
    # Random text: a payload that compresses like real binaries do, not like a bomb.
    head -c $((payload_kib * 768)) /dev/urandom | base64 -w 100
  } > "$dir/payload.txt"
  rm -f "$out/$name.zip"
  (cd "$dir" && zip -q -X -r "$out/$name.zip" .)
}

build_zip sample-windows windows
build_zip sample-amazon2 linux
build_zip sample-amazon2023 linux
build_zip sample-ubuntu-x86_64 linux
build_zip sample-ubuntu-arm64 linux
build_zip sample-redhat8 linux
build_zip sample-redhat9 linux

sha() { sha256sum "$out/$1.zip" | cut -d' ' -f1; }
cat > "$out/manifest.json" <<JSON
{
  "schemaVersion": "2.0",
  "version": "$version",
  "publisher": "pkgmesh examples",
  "packages": {
    "windows": {
      "_any": {
        "x86_64": { "file": "sample-windows.zip" }
      }
    },
    "amazon": {
      "2": {
        "x86_64": { "file": "sample-amazon2.zip" },
        "arm64": { "file": "sample-amazon2.zip" }
      },
      "2023": {
        "_any": { "file": "sample-amazon2023.zip" }
      }
    },
    "ubuntu": {
      "_any": {
        "x86_64": { "file": "sample-ubuntu-x86_64.zip" },
        "arm64": { "file": "sample-ubuntu-arm64.zip" }
      }
    },
    "redhat": {
      "8.*": {
        "x86_64": { "file": "sample-redhat8.zip" }
      },
      "9.*": {
        "x86_64": { "file": "sample-redhat9.zip" },
        "arm64": { "file": "sample-redhat9.zip" }
      }
    }
  },
  "files": {
    "sample-windows.zip": { "checksums": { "sha256": "$(sha sample-windows)" } },
    "sample-amazon2.zip": { "checksums": { "sha256": "$(sha sample-amazon2)" } },
    "sample-amazon2023.zip": { "checksums": { "sha256": "$(sha sample-amazon2023)" } },
    "sample-ubuntu-x86_64.zip": { "checksums": { "sha256": "$(sha sample-ubuntu-x86_64)" } },
    "sample-ubuntu-arm64.zip": { "checksums": { "sha256": "$(sha sample-ubuntu-arm64)" } },
    "sample-redhat8.zip": { "checksums": { "sha256": "$(sha sample-redhat8)" } },
    "sample-redhat9.zip": { "checksums": { "sha256": "$(sha sample-redhat9)" } }
  }
}
JSON
echo "built $(ls "$out"/*.zip | wc -l) ZIPs and manifest.json (version $version) in $out"
