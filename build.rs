// sqlx::migrate! embeds src/store/migrations at compile time; rebuild when they change.
fn main() {
    println!("cargo:rerun-if-changed=src/store/migrations");
}
