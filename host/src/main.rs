// mimalloc: many threads (executor workers, the writer) allocate and free
// each other's memory on every step, where glibc's arenas contend.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cairn::cli::main()
}
