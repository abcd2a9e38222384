from training.osm import classify, parse_other_tags, plural_of, prune_tags


def test_prune_drops_metadata_ids_addresses_and_names() -> None:
    tags = {"building": "house", "source": "bing", "addr:street": "Main", "name": "Villa",
            "osm_id": 5, "@user": "bob", "building:levels": "2", "note": "check",
            "roof:material": "metal", "fixme": "x", "surface": None, "weird_key": "1"}
    assert prune_tags(tags) == {"building": "house", "building:levels": "2",
                                "roof:material": "metal"}


def test_classify_priorities_and_details() -> None:
    school = classify({"building": "school", "amenity": "school"})
    assert school is not None and school.cls == "building" and school.detail == "school building"
    road = classify({"highway": "residential", "surface": "asphalt"})
    assert road is not None and (road.cls, road.detail) == ("road", "residential road")
    assert "asphalt" in road.attributes
    aisle = classify({"highway": "service", "service": "parking_aisle"})
    assert aisle is not None and aisle.detail == "parking aisle"
    assert classify({"amenity": "parking"}).cls == "parking lot"
    assert classify({"landuse": "industrial"}).cls == "industrial area"
    house = classify({"building": "yes", "building:levels": "3"})
    assert house is not None and "three-storey" in house.attributes


def test_invisible_features_have_no_class() -> None:
    assert classify({"boundary": "administrative", "admin_level": "8"}) is None
    assert classify({"name": "Somewhere", "place": "village"}) is None
    assert classify({"highway": "bus_stop"}) is None
    assert classify({}) is None


def test_gdal_other_tags_and_plurals() -> None:
    parsed = parse_other_tags('"building"=>"yes","roof:shape"=>"gabled","name"=>"A \\"B\\""')
    assert parsed == {"building": "yes", "roof:shape": "gabled", "name": 'A "B"'}
    assert parse_other_tags(None) == {}
    assert plural_of("parking lot") == "parking lots"
    assert plural_of("industrial area") == "industrial areas"
    assert plural_of("ditch") == "ditches"
