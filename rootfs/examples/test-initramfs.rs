//! Builds the static test init and packs it as `/init` in an uncompressed initramfs:
//! `cargo run -p rootfs --example test-initramfs -- OUT.cpio [INIT_BINARY]`.
//! Without INIT_BINARY it builds `tests/guest-test-init` first (rootfs::build_test_init).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(out) = args.next().map(PathBuf::from) else {
        eprintln!("usage: test-initramfs OUT.cpio [INIT_BINARY]");
        return ExitCode::from(2);
    };
    let init = match args.next() {
        Some(p) => PathBuf::from(p),
        None => match rootfs::build_test_init() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("test-initramfs: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    match rootfs::test_initramfs(&init, &out) {
        Ok(()) => {
            println!("{} (init: {})", out.display(), init.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("test-initramfs: {e}");
            ExitCode::FAILURE
        }
    }
}
