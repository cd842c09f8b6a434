# etcd for the compose stack and the Kubernetes manifests: Debian's etcd-server on the
# same base as lazyserve (a build argument; scripts/docker-base.sh makes a local one).
#
#   docker build -f deploy/etcd.Dockerfile -t lazyserve-etcd:0.1.0 deploy
ARG RUNTIME_IMAGE=debian:bookworm-slim
FROM ${RUNTIME_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends etcd-server \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/etcd /usr/local/bin/etcd \
    && useradd --system --uid 10002 --user-group --create-home --home-dir /var/lib/etcd-data lazyserve-etcd
USER 10002:10002
EXPOSE 2379 2380
CMD ["etcd", "--data-dir", "/var/lib/etcd-data/default", "--listen-client-urls", "http://0.0.0.0:2379", \
     "--advertise-client-urls", "http://127.0.0.1:2379"]
