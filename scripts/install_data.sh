#!/usr/bin/env bash
# Installs the offline Fashion-MNIST files (Debian package dataset-fashion-mnist) when apt-get is usable.
set -u
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing dataset-fashion-mnist (Debian) ..."
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/tmp/tfkl-apt.log 2>&1; then
    exit 0
  fi
  echo "note: apt-get could not install dataset-fashion-mnist (see /tmp/tfkl-apt.log)"
fi
echo "note: Fashion-MNIST is not installed; it will be downloaded by Keras on a connected machine," \
     "otherwise use --dataset=digits (bundled with scikit-learn, the demo's default)."
