# Sample package install script for Windows (run as .\install.ps1 from the version folder).
$ErrorActionPreference = "Stop"
$target = if ($env:SSM_SAMPLE_TARGET) { $env:SSM_SAMPLE_TARGET } else { Join-Path $PWD "installed" }
New-Item -ItemType Directory -Force -Path $target | Out-Null
$version = Get-Content VERSION
"package=pkgmesh-sample`nversion=$version`naction=$env:BWS_ACTION_NAME" | Set-Content (Join-Path $target "sample.txt")
Copy-Item payload.txt (Join-Path $target "payload.txt")
