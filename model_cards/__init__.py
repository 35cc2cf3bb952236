"""Model cards: `topo_adapter_template.md` is the template every saved topo adapter's card is rendered from (shipped
in the wheel as the package `hf_topoadapt.card_templates`); `<recipe>.md` are the cards the recipes wrote from their
measured results."""
