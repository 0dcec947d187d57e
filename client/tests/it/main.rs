//! Integration tests of keel-client against real `keel` processes (one test binary).
//! Build the server first: `cargo build --release -p keel-server` (or set `KEEL_BIN`).

mod cluster;
mod controlplane;
mod informer;
mod keelctl;
mod kv;
mod lease;
mod lock;
mod mock;
mod watch;
