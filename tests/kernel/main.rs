//! Kernel programs under real traffic in the lab. Root only; run with `cargo xtask test`.

mod connect4;
