// mimalloc for Rust's allocations: executor threads and the writer thread
// allocate and free each other's memory on every step, where glibc's arenas
// contend. (The bundled SQLite keeps the C library's malloc.)
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cairn::cli::main()
}
