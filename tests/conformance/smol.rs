//! The conformance scenarios on `peerlink-smol` (drivers on smol's executor; each member's
//! events collected by a task).

use crate::scenarios;

crate::async_world::async_world!(peerlink_smol);

/// smol's global executor.
pub struct Smol;

impl Exec for Smol {
    const NAME: &'static str = "smol";
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        smol::block_on(f)
    }
    fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        smol::spawn(f).detach();
    }
}

#[test]
fn delivery() {
    scenarios::delivery(&mut AsyncWorld::new(Smol, 4));
}

#[test]
fn encrypted_delivery() {
    scenarios::encrypted_delivery(&mut AsyncWorld::new(Smol, 3));
}

#[test]
fn presence() {
    scenarios::presence(&mut AsyncWorld::new(Smol, 3));
}

#[test]
fn refusals() {
    scenarios::refusals(&mut AsyncWorld::new(Smol, 3));
}

#[test]
fn leave_and_close() {
    scenarios::leave_and_close(&mut AsyncWorld::new(Smol, 3));
}
