// Tests of BerthStats land here.
