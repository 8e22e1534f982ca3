//! OpenAI-compatible LLM simulator (`llmproxy mock-llm`). Placeholder, being written.

/// Simulator options (CLI flags of `llmproxy mock-llm`).
#[derive(clap::Args, Debug, Clone)]
pub struct MockOptions {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8001")]
    pub listen: String,
}

pub fn run(_opts: MockOptions) -> std::io::Result<()> {
    unimplemented!()
}
