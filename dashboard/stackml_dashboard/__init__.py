"""stackml's Horizon plugin: the "Machine Learning" dashboard (server-rendered Django panels)."""
