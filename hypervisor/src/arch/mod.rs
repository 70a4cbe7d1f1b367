//! Architecture code. Only x86-64 with VT-x is supported.
pub mod x86;
