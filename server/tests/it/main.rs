//! Integration tests: real `keel` processes on 127.0.0.1, driven with the `etcd-client` crate
//! and with real `etcdctl`.

mod auth;
mod cluster;
mod etcdctl;
mod gateway;
mod kv;
mod lease;
mod lock;
mod maintenance;
mod membership;
mod metrics;
mod replication;
mod tls;
mod watch;
