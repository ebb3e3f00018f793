#!/usr/bin/env bash
# Fill the pinned ComfyUI cache that comfyui_env.py looks in:
#   ${XDG_CACHE_HOME:-~/.cache}/comfy-selfnpo/ComfyUI-8ad38d20
# by cloning upstream commit 8ad38d2073b019a204f730182dcf5456fb260858 from COMFYUI_GIT
# (default: ComfyUI's public repository; a local clone or mirror path works too, for offline machines).
# Does nothing when the cache already holds a ComfyUI tree.
set -euo pipefail
commit=8ad38d2073b019a204f730182dcf5456fb260858
dest="${XDG_CACHE_HOME:-$HOME/.cache}/comfy-selfnpo/ComfyUI-${commit:0:8}"
if [ -f "$dest/comfy/samplers.py" ] && [ -f "$dest/nodes.py" ]; then
  echo "ComfyUI ${commit:0:8}: $dest"
  exit 0
fi
src="${COMFYUI_GIT:-https://github.com/comfyanonymous/ComfyUI}"
echo "ComfyUI ${commit:0:8} not found at $dest; cloning it from $src" >&2
mkdir -p "$(dirname "$dest")"
tmp=$(mktemp -d "${dest}.partial.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
if ! git clone --quiet --no-checkout "$src" "$tmp" || ! git -C "$tmp" checkout --quiet "$commit"; then
  cat >&2 <<MSG
Could not get ComfyUI commit $commit from $src.
Set COMFYUI_GIT to a ComfyUI git repository that holds this commit (a URL or a local path),
or point COMFYUI_PATH at an existing ComfyUI checkout, and run this again.
MSG
  exit 2
fi
rm -rf "$tmp/.git"
echo "$commit" >"$tmp/.comfyui-commit"
rm -rf "$dest"; mv "$tmp" "$dest"; trap - EXIT
echo "ComfyUI ${commit:0:8}: $dest"
