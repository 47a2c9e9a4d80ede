//! The `platform` binary: one entry point for every part of the platform.
fn main() {
    println!("platform: nothing to run yet");
}
