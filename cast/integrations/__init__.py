"""Integrations with outside tools. Import them from their modules (e.g.
`cast.integrations.fiftyone_export`), so that `import cast` never starts FiftyOne's database."""
