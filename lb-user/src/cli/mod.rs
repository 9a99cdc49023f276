//! What the `lb` commands print and check on the client side.
pub mod checks;
pub mod preset;
pub mod status;
pub mod top;
