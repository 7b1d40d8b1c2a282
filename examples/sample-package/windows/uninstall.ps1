$ErrorActionPreference = "Stop"
$target = if ($env:SSM_SAMPLE_TARGET) { $env:SSM_SAMPLE_TARGET } else { Join-Path $PWD "installed" }
Remove-Item -Force -ErrorAction SilentlyContinue (Join-Path $target "sample.txt"), (Join-Path $target "payload.txt")
