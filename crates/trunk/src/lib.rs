//! The trunk: node-to-node server transport (see DESIGN.md, "The trunk protocol").
