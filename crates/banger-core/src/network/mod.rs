//! VM addressing: which subnet banger uses, which address each VM gets.

pub mod address;
pub mod dns;

crate::error::message_error! {
    /// VM networking cannot be set up or asked as configured.
    NetError
}
