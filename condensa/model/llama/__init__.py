"""The LLaMA family (LLaMA, Mistral, Qwen2, SmolLM2): its configuration (`config`), network (`network`)
and Hugging Face weight mapping (`convert`)."""
