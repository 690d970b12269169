# The Berth image: FROM scratch, holding `berth` and exactly the shared libraries it needs.
#
# Build it with scripts/image, not with `docker build .`: the script builds berth (release, the
# Swift stdlib and FoundationEssentials linked statically; or, with --debug, the debug binary and
# the toolchain's Swift runtime), copies the stripped binary to rootfs/usr/local/bin/berth and every library `ldd` lists
# (and the dynamic loader) to rootfs/ at its own path, and runs `docker build` on that context.
#
# Run it as the seed ran docker-register and docker-discover, as one container:
#   docker run -d --net host -v /var/run/docker.sock:/var/run/docker.sock \
#       -e ETCD_HOST=10.0.0.1:2379 -e HOST_IP=10.0.0.5 berth
FROM scratch
COPY rootfs/ /
ENTRYPOINT ["/usr/local/bin/berth"]
CMD ["run"]
