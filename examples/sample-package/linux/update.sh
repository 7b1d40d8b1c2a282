#!/bin/sh
# In-place update: rewrite the files without an uninstall first.
set -eu
exec sh install.sh
