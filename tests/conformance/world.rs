//! What every backend offers the scenarios: N members, room commands by member index, and the
//! room events each member saw.

use peerlink::{Fingerprint, JoinOptions, RoomData, RoomError, RoomEvent, RoomOptions, RoomView};

/// A backend's result: `Err(Some(e))` for a room refusal, `Err(None)` for anything else.
pub type RoomResult = Result<(), Option<RoomError>>;

/// N members on one backend (an adapter, or the simulator).
pub trait World {
    /// The backend's name, for messages.
    fn backend(&self) -> &'static str;
    /// How many members.
    fn len(&self) -> usize;
    /// Member `i`'s fingerprint.
    fn fingerprint(&self, i: usize) -> Fingerprint;
    /// Creates `room` from member `i` and waits until it is in it.
    fn create_room(&mut self, i: usize, room: &str, options: RoomOptions) -> RoomResult;
    /// Joins `room` from member `i` and waits until it is in it (or refused).
    fn join_room(&mut self, i: usize, room: &str, options: JoinOptions) -> RoomResult;
    /// `Room::send_data` from member `i`.
    fn send(&mut self, i: usize, room: &str, to: Option<Fingerprint>, data: RoomData) -> RoomResult;
    /// `Room::broadcast_via_server` of JSON `value` from member `i`.
    fn broadcast_via_server(&mut self, i: usize, room: &str, value: &serde_json::Value) -> RoomResult;
    /// `Room::kick` from member `i`.
    fn kick(&mut self, i: usize, room: &str, peer: Fingerprint) -> RoomResult;
    /// `Room::set_presence` from member `i`.
    fn set_presence(&mut self, i: usize, room: &str, state: Option<&serde_json::Value>) -> RoomResult;
    /// `Room::leave` from member `i`.
    fn leave(&mut self, i: usize, room: &str) -> RoomResult;
    /// `Room::info` of member `i`.
    fn info(&mut self, i: usize, room: &str) -> Option<RoomView>;
    /// Lets time pass (real or virtual) until `done` holds for the room events seen so far;
    /// panics after a while.
    fn run_until(&mut self, what: &str, done: &mut dyn FnMut(&[Vec<RoomEvent>]) -> bool);
    /// Every room event member `i` saw so far.
    fn events(&self, i: usize) -> &[RoomEvent];
}
