#!/usr/bin/env bash
# Install the data sources of the stream recipes (`vlcl streams build split-fmnist|mini-mtil|offline-pretrain`).
# Idempotent: whatever is already there is skipped.
#
#   Debian packages (apt-get, as root or with sudo):
#     dataset-fashion-mnist    /usr/share/datasets/fashion-mnist/       (MIT)
#     opencv-doc               /usr/share/doc/opencv-doc/examples/data/digits.png
#     tuxpaint-stamps-default  /usr/share/tuxpaint/stamps/              (GPL-2)
#     librsvg2-bin             rsvg-convert, renders the SVG emoji and stamps
#   npm packages, extracted (not installed) into $VLCL_SOURCES_DIR/npm/<package>/ (default ~/.cache/vlcl/sources):
#     emoji-datasource-google@16.0.0   (Apache-2.0 images), emoji-datasource-twitter@16.0.0 (CC-BY-4.0 images),
#     openmoji@17.0.0                  (CC-BY-SA-4.0)
#   A tarball already at $VLCL_NPM_TARBALLS/<package>-<version>.tgz is used instead of `npm pack`.
set -euo pipefail

sources_dir="${VLCL_SOURCES_DIR:-$HOME/.cache/vlcl/sources}"
tarballs="${VLCL_NPM_TARBALLS:-}"

# --- Debian packages: install the ones whose files are missing ---
missing=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
[ -f /usr/share/doc/opencv-doc/examples/data/digits.png ] || missing+=(opencv-doc)
[ -d /usr/share/tuxpaint/stamps/animals ] || missing+=(tuxpaint-stamps-default)
command -v rsvg-convert >/dev/null 2>&1 || missing+=(librsvg2-bin)
if [ ${#missing[@]} -gt 0 ]; then
    as_root=""
    if [ "$(id -u)" -ne 0 ]; then as_root="sudo"; fi
    echo "install_sources: apt-get install ${missing[*]}"
    $as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq "${missing[@]}"
fi

# --- npm packages: `npm pack` the tarball, extract it without the leading package/ folder ---
for spec in emoji-datasource-google@16.0.0 emoji-datasource-twitter@16.0.0 openmoji@17.0.0; do
    name="${spec%@*}"
    version="${spec#*@}"
    target="$sources_dir/npm/$name"
    marker="$target/.vlcl-extracted-$version"
    if [ -f "$marker" ]; then
        continue
    fi
    work="$(mktemp -d)"
    tarball="$tarballs/$name-$version.tgz"
    if [ -z "$tarballs" ] || [ ! -f "$tarball" ]; then
        echo "install_sources: npm pack $spec"
        (cd "$work" && npm pack --silent "$spec" >/dev/null)
        tarball="$work/$name-$version.tgz"
    fi
    # Extract beside the target and rename, so an interrupted run never looks complete.
    mkdir -p "$sources_dir/npm"
    partial="$target.partial-$$"
    rm -rf "$partial"
    mkdir -p "$partial"
    tar -xzf "$tarball" -C "$partial" --strip-components=1
    touch "$partial/.vlcl-extracted-$version"
    rm -rf "$target"
    mv "$partial" "$target"
    rm -rf "$work"
    echo "install_sources: $spec -> $target"
done
echo "install_sources: all sources present (npm packages in $sources_dir/npm)"
