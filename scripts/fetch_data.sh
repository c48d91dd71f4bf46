#!/usr/bin/env bash
# Fetch the default texts and images from Debian packages into DIR (default: $VNMSPARSE_DATA, else the per-user
# data folder ${XDG_DATA_HOME:-~/.local/share}/vnmsparse/data, where the package looks):
#   Jane Austen's six novels (r-cran-janeaustenr)    -> calibration / training text
#   Moby Dick (r-cran-tokenizers)                    -> evaluation text
#   Fashion-MNIST (dataset-fashion-mnist)            -> the ViT experiment
# Only the data files are unpacked (dpkg -x); R itself is not installed.
set -euo pipefail
dest="${1:-${VNMSPARSE_DATA:-${XDG_DATA_HOME:-$HOME/.local/share}/vnmsparse/data}}"
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
[ -n "$(ls /var/lib/apt/lists/ 2>/dev/null | grep -v lock)" ] || apt-get update -qq
cd "$work"
chmod 777 "$work"
apt-get download -qq r-cran-janeaustenr r-cran-tokenizers dataset-fashion-mnist
for deb in *.deb; do dpkg -x "$deb" root; done
lib=root/usr/lib/R/site-library
mkdir -p "$dest/janeaustenr" "$dest/tokenizers" "$dest/fashion-mnist"
cp "$lib"/janeaustenr/data/Rdata.* "$dest/janeaustenr/"
cp "$lib"/tokenizers/data/Rdata.* "$dest/tokenizers/"
cp root/usr/share/datasets/fashion-mnist/*.gz "$dest/fashion-mnist/"
echo "data ready in $dest"
