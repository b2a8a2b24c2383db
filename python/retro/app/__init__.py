"""The command line `retro`: its commands, their options, the demo's default corpus."""
