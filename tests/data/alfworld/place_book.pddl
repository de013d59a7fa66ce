;; task: put some book on sidetable
;; The simplest ALFWorld task type (pick and place): a book from the bed to the side table.
(define (problem place_book)
(:domain alfred)
(:objects
  agent1 - agent
  book_bar_1 pillow_bar_1 - object
  bed_bar_1 sidetable_bar_1 - receptacle
  loc_bar_0 loc_bar_1 loc_bar_2 - location
  BookType PillowType - otype
  BedType SideTableType - rtype)
(:init
  (atLocation agent1 loc_bar_0)
  (receptacleAtLocation bed_bar_1 loc_bar_1)
  (receptacleAtLocation sidetable_bar_1 loc_bar_2)
  (receptacleType bed_bar_1 BedType)
  (receptacleType sidetable_bar_1 SideTableType)
  (inReceptacle book_bar_1 bed_bar_1)
  (inReceptacle pillow_bar_1 bed_bar_1)
  (objectAtLocation book_bar_1 loc_bar_1)
  (objectAtLocation pillow_bar_1 loc_bar_1)
  (objectType book_bar_1 BookType)
  (objectType pillow_bar_1 PillowType)
  (pickupable book_bar_1)
  (pickupable pillow_bar_1)
  (canContain BedType BookType)
  (canContain BedType PillowType)
  (canContain SideTableType BookType)
  (canContain SideTableType PillowType))
(:goal (and (exists (?r - receptacle) (exists (?o - object) (and
  (inReceptacle ?o ?r) (objectType ?o BookType) (receptacleType ?r SideTableType)))))))
