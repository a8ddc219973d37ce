//! The conformance scenarios on `peerlink-tokio` (drivers on a multi-thread tokio runtime;
//! each member's events collected by a task).

use crate::scenarios;

crate::async_world::async_world!(peerlink_tokio);

/// A multi-thread tokio runtime of its own.
pub struct Tokio(::tokio::runtime::Runtime);

impl Tokio {
    fn new() -> Self {
        Tokio(::tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime"))
    }
}

impl Exec for Tokio {
    const NAME: &'static str = "tokio";
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.0.block_on(f)
    }
    fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        self.0.spawn(f);
    }
}

#[test]
fn delivery() {
    scenarios::delivery(&mut AsyncWorld::new(Tokio::new(), 4));
}

#[test]
fn encrypted_delivery() {
    scenarios::encrypted_delivery(&mut AsyncWorld::new(Tokio::new(), 3));
}

#[test]
fn presence() {
    scenarios::presence(&mut AsyncWorld::new(Tokio::new(), 3));
}

#[test]
fn refusals() {
    scenarios::refusals(&mut AsyncWorld::new(Tokio::new(), 3));
}

#[test]
fn leave_and_close() {
    scenarios::leave_and_close(&mut AsyncWorld::new(Tokio::new(), 3));
}
