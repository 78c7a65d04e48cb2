//! VM addressing: which subnet banger uses, which address each VM gets.

pub mod address;
pub mod dns;
