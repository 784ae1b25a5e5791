"""GPT-2: its configuration (`config`), network (`network`) and Hugging Face weight mapping (`convert`)."""
