#!/bin/sh
# Container entry point. SageMaker starts containers as `docker run IMAGE serve`; plain `docker run IMAGE`
# passes nothing. Both start TorchServe in the foreground with the image's config.
set -e
[ "${1:-}" = "serve" ] && shift
# key_file.json, logs and the unpacked archive private from their first byte (TorchServe sets 600 only afterwards).
umask 077
exec torchserve --start --foreground --ncs --ts-config "${TS_CONFIG:-/srv/melanoma/config.properties}" \
  --log-config /srv/melanoma/log4j2.xml "$@"
